"""One error family, so hosts can catch everything the extension raises on purpose."""


class MultiConceptError(Exception):
    """Base of every error the extension raises on purpose."""


class PlanError(MultiConceptError, ValueError):
    """Bad input for a job. The message names the field and the problem."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}" if field else problem)


class LoraMismatchError(PlanError):
    """A LoRA that does not fit the model (e.g. an SDXL LoRA on an SD1.5 UNet)."""


class EngineError(MultiConceptError, RuntimeError):
    """The sampling run broke an assumption the engine relies on."""
