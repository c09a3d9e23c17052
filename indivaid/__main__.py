"""``python -m indivaid COMMAND``: the library's command-line entry point."""

from __future__ import annotations

import sys

from indivaid.logs import setup_logging

COMMANDS = {"demo": "indivaid.demo", "train": "indivaid.cli", "evaluate": "indivaid.cli", "embed": "indivaid.cli",
            "match": "indivaid.cli", "robustness": "indivaid.cli", "export": "indivaid.cli"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        from indivaid.registry import did_you_mean

        hint = did_you_mean(argv[0], list(COMMANDS)) if argv and argv[0] not in ("-h", "--help") else ""
        print(f"usage: python -m indivaid {{{','.join(COMMANDS)}}} [options]{hint}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    setup_logging()
    import importlib

    from indivaid.config import ConfigError
    from indivaid.data.catalogue import DataError
    from indivaid.export import ExportError
    from indivaid.models.backbone import WeightsError
    from indivaid_field import FieldError

    module = importlib.import_module(COMMANDS[argv[0]])
    entry = module.COMMANDS[argv[0]] if hasattr(module, "COMMANDS") else module.main
    try:
        entry(argv[1:])
    except (DataError, ConfigError, WeightsError, FieldError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
