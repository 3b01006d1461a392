"""Regenerate OUT/report.html and the PNG plots from the artifacts of a `mpqc compile` run."""

from __future__ import annotations

HELP = "regenerate the HTML report and plots of a compile directory"


def add_arguments(p) -> None:
    p.add_argument("out", metavar="OUTDIR", help="the -o directory of a `mpqc compile` run")


def run(args):
    from mpqc.compiler.report import write_report

    paths = write_report(args.out)
    if not args.json:
        print(f"report: {paths['report']}")
    return paths
