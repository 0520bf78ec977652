"""`python -m dynaflip_adapt` runs the CLI."""

from dynaflip_adapt.cli.app import main

if __name__ == "__main__":
    main()
