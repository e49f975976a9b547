"""``python -m repdyn ...`` and ``torchrun -m repdyn ...``: the same as the ``probe`` command."""

from repdyn.cli import main

if __name__ == "__main__":
    main()
