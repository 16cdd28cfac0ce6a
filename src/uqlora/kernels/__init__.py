"""Optional GPU kernels. Modules here import `triton` at import time; import them lazily (see `uqlora.losses`)."""
