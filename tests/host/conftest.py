import os
import sys

# the slice of A1111's `modules` API the host glue imports (tests/hostlike/modules)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hostlike"))
