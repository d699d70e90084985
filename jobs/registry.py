"""Inspect and govern the model registry.

    python -m jobs.registry list
    python -m jobs.registry show adult_mlp                 # versions and aliases of a model
    python -m jobs.registry show adult_mlp@production      # one version: lineage, gates, files
    python -m jobs.registry history adult_mlp              # its audit records, oldest first
    python -m jobs.registry lineage --dataset-version 3f9c # versions built from a dataset version
    python -m jobs.registry approve adult_mlp:3 --reason "reviewed card"   # approver
    python -m jobs.registry alias adult_mlp champion 3 [--expect 2]        # compare-and-swap
    python -m jobs.registry rollback adult_mlp@production --reason "p99 regression"
    python -m jobs.registry delete adult_mlp:2 --reason "..."              # admin
    python -m jobs.registry retrain --dataset-version 3f9c --reason "erasure request #12"
    python -m jobs.registry audit verify | audit export --out audit.jsonl | audit verify --file audit.jsonl
    python -m jobs.registry whoami
    python -m jobs.registry policy show | policy set policy.yaml --reason "..."   # admin

Settings are Hydra overrides after the command: db.url=postgresql://... storage.uri=s3://...
registry.policy=policy.yaml. Add --json for machine-readable output. Exit codes: 0 ok, 6 registry
error, 7 denied, 8 lost a compare-and-swap, 9 audit chain broken.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mlops_ray.errors import user_errors


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jobs.registry", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    sub.add_parser("whoami")
    sub.add_parser("show").add_argument("ref", help="model, model:VERSION or model@ALIAS")
    sub.add_parser("history").add_argument("model")
    lin = sub.add_parser("lineage")
    lin.add_argument("--dataset-version")
    lin.add_argument("--run")
    lin.add_argument("--config-hash")
    al = sub.add_parser("alias")
    al.add_argument("model")
    al.add_argument("alias")
    al.add_argument("version", type=int)
    al.add_argument("--expect", help="version the alias must hold now ('none': unset)")
    al.add_argument("--reason")
    al.add_argument("--force", action="store_true", help="production despite failed gates (admin)")
    ap_ = sub.add_parser("approve", help="move production to MODEL:VERSION (approver)")
    ap_.add_argument("ref")
    ap_.add_argument("--reason", required=True)
    rb = sub.add_parser("rollback")
    rb.add_argument("ref", help="model@alias (default alias: production)")
    rb.add_argument("--reason", required=True)
    de = sub.add_parser("delete")
    de.add_argument("ref", help="model:VERSION")
    de.add_argument("--reason", required=True)
    rt = sub.add_parser("retrain", help="mark every version trained on a dataset version")
    rt.add_argument("--dataset-version", required=True)
    rt.add_argument("--reason", required=True)
    po = sub.add_parser("policy", help="the access policy stored in the registry")
    po.add_argument("action", choices=["show", "set"])
    po.add_argument("file", nargs="?", help="set: the new policy YAML (admin)")
    po.add_argument("--reason")
    au = sub.add_parser("audit")
    au.add_argument("action", choices=["verify", "export", "show"])
    au.add_argument("--out", help="export: JSON-lines file")
    au.add_argument("--file", help="verify an exported JSON-lines file instead of the database")
    return ap


def _row(v: Any) -> str:
    m = v.metrics or {}
    auc = f"{m['test/auc']:.4f}" if m.get("test/auc") is not None else "-"
    return (f"{v.ref:<24} {'passed' if v.gate_passed else 'FAILED':<7} {auc:<7} {v.status:<18} "
            f"{','.join(v.aliases) or '-':<22} {v.run_name or '-'}")


def _out(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj, indent=1, default=str) if args.json else text, flush=True)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from mlops_ray.config.compose import job as compose_job
    from mlops_ray.config.evaluate import RegistryJob
    from mlops_ray.registry import ANY, open_registry, parse_ref
    job = compose_job("registry_cli", RegistryJob, overrides)
    reg = open_registry(job)
    c = args.cmd
    if c == "whoami":
        d = reg.policy.describe(reg.actor)
        _out(args, d, f"{d['identity']} (role: {d['role']}; policy: {d['policy']})")
    elif c == "list":
        ms = reg.models()
        _out(args, ms, "\n".join(f"{m['model']:<24} versions={m['versions']:<4} latest={m['latest']}"
                                 f"  aliases={m['aliases']}" for m in ms) or "(no models)")
    elif c == "show":
        name, alias, version = parse_ref(args.ref)
        if alias is None and version is None:
            vs = reg.versions(name)
            _out(args, {"model": name, "aliases": reg.aliases(name),
                        "versions": [v.to_dict() for v in vs]},
                 f"{'version':<24} {'gates':<7} {'AUC':<7} {'status':<18} {'aliases':<22} run\n"
                 + "\n".join(_row(v) for v in vs))
        else:
            v = reg.get(args.ref)
            _out(args, v.to_dict(), "\n".join(f"{k:<13} {val}" for k, val in v.to_dict().items()))
    elif c == "history":
        recs = reg.audit_log(args.model)
        _out(args, recs, "\n".join(
            f"{r['seq']:>4} {r['ts']} {r['actor']:<10} {r['action']:<16} {r['outcome']:<6} "
            f"v{r['version'] if r['version'] is not None else '-'}"
            f"{' ' + r['alias'] + ': ' + str(r['from_version']) + ' -> ' + str(r['to_version']) if r['alias'] else ''}"
            f"{' verdict=' + r['verdict'] if r['verdict'] else ''}"
            f"{' reason=' + repr(r['reason']) if r['reason'] else ''}" for r in recs))
    elif c == "lineage":
        if not (args.dataset_version or args.run or args.config_hash):
            print("error: give --dataset-version, --run or --config-hash", file=sys.stderr)
            return 2
        vs = reg.lineage(args.dataset_version, args.run, args.config_hash)
        _out(args, [v.to_dict() for v in vs], "\n".join(
            f"{v.ref:<24} data={v.data_version} config={v.config_hash} status={v.status} "
            f"run={v.run_uri}" for v in vs) or "(no versions)")
    elif c == "alias":
        exp = ANY if args.expect is None else (None if args.expect == "none" else int(args.expect))
        v = reg.set_alias(args.model, args.alias, args.version, expected=exp, reason=args.reason,
                          force=args.force)
        _out(args, v.to_dict(), f"{args.model}@{args.alias} -> {v.version}")
    elif c == "approve":
        name, _, version = parse_ref(args.ref)
        if version is None:
            print("error: approve takes model:VERSION", file=sys.stderr)
            return 2
        cur = reg.aliases(name).get("production")
        v = reg.set_alias(name, "production", version, expected=cur, reason=args.reason)
        _out(args, v.to_dict(), f"{name}@production: {cur} -> {v.version}")
    elif c == "rollback":
        name, alias, _ = parse_ref(args.ref if "@" in args.ref else args.ref + "@production")
        before, after = reg.rollback(name, alias or "production", args.reason)
        _out(args, {"from": before, "to": after}, f"{name}@{alias}: {before} -> {after}")
    elif c == "delete":
        name, _, version = parse_ref(args.ref)
        if version is None:
            print("error: delete takes model:VERSION", file=sys.stderr)
            return 2
        reg.delete(name, version, args.reason)
        _out(args, {"deleted": args.ref}, f"deleted {args.ref} (record and audit kept)")
    elif c == "retrain":
        vs = reg.mark_retrain(args.dataset_version, args.reason)
        _out(args, [v.ref for v in vs], "\n".join(f"marked for retraining: {v.ref}" for v in vs)
             or f"no active version was trained on dataset version {args.dataset_version}")
    elif c == "policy":
        if args.action == "set":
            if not args.file:
                print("error: policy set needs the policy FILE", file=sys.stderr)
                return 2
            from mlops_ray.registry import Policy
            reg.set_policy(Policy.load(args.file), args.reason)
        p = reg.policy
        _out(args, {"source": p.source, "sha256": p.digest(), "roles": p.roles,
                    "tokens": len(p.tokens)},
             f"policy: {p.source}\nsha256: {p.digest()}\n{p.text()}")
    elif c == "audit":
        if args.action == "export":
            if not args.out:
                print("error: audit export needs --out FILE", file=sys.stderr)
                return 2
            n = reg.export_audit(args.out)
            _out(args, {"records": n, "file": args.out}, f"{n} records -> {args.out}")
        elif args.action == "show":
            recs = reg.audit_log()
            _out(args, recs, "\n".join(json.dumps(r, default=str) for r in recs))
        else:
            recs = None
            if args.file:
                with open(args.file) as f:
                    recs = [json.loads(line) for line in f if line.strip()]
            problems = reg.verify_audit(recs)
            n = len(recs if recs is not None else reg.audit_log())
            _out(args, {"ok": not problems, "records": n, "problems": problems},
                 f"audit chain intact: {n} records" if not problems else
                 "audit chain BROKEN:\n" + "\n".join(f"  - {p}" for p in problems))
            return 0 if not problems else 9
    return 0


def main(argv: list[str] | None = None) -> None:
    args, extra = parser().parse_known_args(argv)
    bad = [a for a in extra if "=" not in a or a.startswith("-")]
    if bad:
        parser().error(f"unrecognised arguments: {' '.join(bad)} (settings are key=value)")
    with user_errors():
        sys.exit(run(args, extra))


if __name__ == "__main__":
    from mlops_ray.runtime import run_main
    run_main(main)
