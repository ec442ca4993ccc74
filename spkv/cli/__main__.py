"""`python -m spkv.cli`: the same as the `spkv` command."""

from spkv.cli import main

main()
