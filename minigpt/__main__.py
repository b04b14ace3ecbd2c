"""`python -m minigpt ...` runs the `minigpt` command."""

from minigpt.cli import main

if __name__ == "__main__":
    main()
