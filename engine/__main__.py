"""`python -m reca.engine` (and `torchrun -m reca.engine`) runs the `reca` CLI."""
from reca.engine.cli import main

if __name__ == "__main__":
    main()
