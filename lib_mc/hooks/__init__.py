"""Forward replacements installed on UNet module instances during stage 2."""
