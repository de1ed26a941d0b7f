"""Command-line entry points: the OpenRLHF launcher wrappers and the ``persrm`` command."""
