"""`python -m medusa_runtime.serve DIR ...` is `medusa-serve DIR ...`."""

from .server import main

main()
