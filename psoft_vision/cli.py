"""The ``psoft-vision`` command: ``psoft-vision bench ...`` (see ``psoft-vision bench --help``)."""

import sys

COMMANDS = {"bench": "psoft_vision.bench"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: psoft-vision {{{','.join(COMMANDS)}}} [options]; psoft-vision COMMAND --help for more",
              file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
