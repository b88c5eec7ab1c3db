"""`chuxin-ray <stage> CONFIG [key=value ...]`: load a config, call a stage's main. No logic here."""

from __future__ import annotations

import argparse
import logging
import sys

from chuxin_ray import __version__, launch, stages
from chuxin_ray.config import STAGES, ConfigError, describe_sections, load_config
from chuxin_ray.storage import OutputConflict, StorageError

EPILOG = """stages (in pipeline order):
{stages}

config sections and their keys:
{sections}

examples:
  chuxin-ray pipeline jobs/tiny.yaml
  chuxin-ray ingest jobs/tiny.yaml ingest.rules.min_chars=20 run.output=s3://bucket/runs/x
"""


def build_parser() -> argparse.ArgumentParser:
    stage_lines = "\n".join(f"  {s:<11} {stages.SUMMARY[s]}" for s in STAGES)
    parser = argparse.ArgumentParser(
        prog="chuxin-ray",
        description="The Chuxin-Embedding training recipe as a Ray application.",
        epilog=EPILOG.format(stages=stage_lines, sections=describe_sections()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"chuxin-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in (*STAGES, "pipeline"):
        help_ = stages.SUMMARY.get(name, "run every configured stage in order, skipping complete ones")
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("config", metavar="CONFIG", help="YAML config file")
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="dotted overrides, e.g. ingest.rules.min_chars=10",
        )
        p.add_argument("--force", action="store_true", help="redo even if the output is complete")
        if name == "pipeline":
            p.add_argument("--from", dest="start", metavar="STAGE", help="start at this stage")
            p.add_argument("--only", metavar="STAGE", help="run only this stage")
    serve_help = "deploy the OpenAI-compatible LLM endpoint of the config's `serve` section on Ray Serve"
    serve_p = sub.add_parser("serve", help=serve_help, description=serve_help)
    serve_p.add_argument("config", metavar="CONFIG", help="YAML config file")
    serve_p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. serve.port=8001"
    )
    demo = sub.add_parser(
        "demo-data", help="write the tiny demo corpus and tokenizer that jobs/tiny.yaml reads"
    )
    demo.add_argument("out", nargs="?", default="demo", help="folder (default: demo)")
    report_help = "write <RUN_URI>/report/report.{md,html}: stages, data funnel, losses, scores, evaluation"
    report_p = sub.add_parser("report", help=report_help, description=report_help)
    report_p.add_argument("run_uri", metavar="RUN_URI", help="a run's output (run.output): path or s3://")
    plan_help = "GPU-hours, nodes, storage and LLM tokens a run of the config's `plan` section needs"
    plan_p = sub.add_parser("plan", help=plan_help, description=plan_help)
    plan_p.add_argument("config", metavar="CONFIG", help="YAML config file with a `plan` section")
    plan_p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. plan.mfu=0.35")
    launch.add_parsers(sub)  # launch, status: the run as KubeRay objects
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "demo-data":
        from chuxin_ray import demo

        demo.prepare(args.out)
        return 0
    if args.command in ("launch", "status"):
        return launch.run_command(args)
    try:
        if args.command == "report":  # storage settings from the AWS_* environment
            from chuxin_ray.report import write_report

            print(write_report(args.run_uri)["html"])
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "plan":  # arithmetic only: starts no Ray
            from chuxin_ray import plan

            plan.main(cfg)
        elif args.command == "serve":
            from chuxin_ray.llm.service import deploy

            deploy(cfg)
        elif args.command == "pipeline":
            from chuxin_ray.pipeline import run_pipeline

            run_pipeline(cfg, start=args.start, only=args.only, force=args.force)
        else:
            stages.load(args.command).main(cfg, force=args.force)
    except (ConfigError, StorageError, OutputConflict) as e:
        print(f"chuxin-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
