"""Mutation testing: plant each curated bug (tests/mutation/mutations.py) in a temporary copy of
the project, one at a time, run the tests that should catch it, and print which test killed it.

    python tests/mutation/run.py                  # every mutation (fails if one survives)
    python tests/mutation/run.py --only act-relu-tie,plan-keeps-a-copy
    python tests/mutation/run.py --list           # the mutations and the bugs they model

Nothing is installed: the copy is laid out as the installed package (setuptools' package-dir
mapping from pyproject.toml: src/fusedlinear -> fusedlinear, kernels -> fusedlinear/kernels, ...)
and put first on PYTHONPATH, ahead of any installed or editable fusedlinear, for pytest and every
process the tests start. A mutation in kernels/ gets a fresh, empty NUMBA_CACHE_DIR, so stale
compiled kernels can never hide it; the others share one cache of the unmutated kernels (the
trees are built at one path, so its entries match byte-identical kernel files). A mutation whose ``old`` text is not found exactly once fails
the whole run before anything runs: the list must follow the code.

Every pytest run has MALLOC_PERTURB_=165 (glibc overwrites freed memory, so a lifetime bug shows).
First the unmutated copy runs every selected test (all must pass: a kill means nothing otherwise;
--no-baseline skips it). Exit status 0 only if every mutation is killed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COPIED = ("pyproject.toml", "kernels", "backend", "torch_ext", "src", "tests")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "mutation")


def load_mutations() -> list[dict]:
    spec = importlib.util.spec_from_file_location("mutations", os.path.join(os.path.dirname(__file__), "mutations.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MUTATIONS


def check_patterns(mutations: list[dict]) -> list[str]:
    """Every problem with the list: a pattern not found exactly once, a duplicate id, a no-op."""
    problems, seen = [], set()
    for m in mutations:
        if m["id"] in seen:
            problems.append(f"{m['id']}: duplicate id")
        seen.add(m["id"])
        path = os.path.join(ROOT, m["file"])
        if not os.path.isfile(path):
            problems.append(f"{m['id']}: file {m['file']} does not exist")
            continue
        count = open(path, encoding="utf-8").read().count(m["old"])
        if count != 1:
            problems.append(f"{m['id']}: pattern found {count} times in {m['file']} (must be exactly once): {m['old']!r}")
        if m["old"] == m["new"]:
            problems.append(f"{m['id']}: new == old")
    return problems


def build_tree(dest: str, mutation: dict | None) -> tuple[str, str]:
    """A copy of the repository at dest/repo (mutated if asked) and the import tree dest/site
    built from it with pyproject's package-dir mapping. Returns (repo, site)."""
    repo, site = os.path.join(dest, "repo"), os.path.join(dest, "site")
    os.makedirs(repo)
    for name in COPIED:
        src = os.path.join(ROOT, name)
        (shutil.copytree(src, os.path.join(repo, name), ignore=IGNORE) if os.path.isdir(src)
         else shutil.copy2(src, os.path.join(repo, name)))
    if mutation is not None:
        path = os.path.join(repo, mutation["file"])
        text = open(path, encoding="utf-8").read()
        assert text.count(mutation["old"]) == 1, mutation["id"]
        with open(path, "w", encoding="utf-8") as f:
            f.write(text.replace(mutation["old"], mutation["new"]))
    with open(os.path.join(repo, "pyproject.toml"), "rb") as f:
        package_dir = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(package_dir.items()):  # parents before children
        shutil.copytree(os.path.join(repo, folder), os.path.join(site, *package.split(".")), ignore=IGNORE,
                        dirs_exist_ok=True)
    return repo, site


def environment(site: str, cache: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = site + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["NUMBA_CACHE_DIR"] = cache
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["MALLOC_PERTURB_"] = "165"  # glibc fills freed memory with garbage: a use-after-free reads it (as .ci/run)
    return env


def check_import(site: str, env: dict) -> None:
    """The copy, not an installed fusedlinear, is what the tests import."""
    out = subprocess.run([sys.executable, "-c", "import fusedlinear.kernels.activations as a; print(a.__file__)"],
                         capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0 or not out.stdout.strip().startswith(site):
        raise SystemExit(f"mutation run: the copy at {site} is not what Python imports: {out.stdout}{out.stderr[-2000:]}")


def run_tests(repo: str, env: dict, args: list[str], timeout: float, stop_first: bool) -> tuple[str, str]:
    """(outcome, detail): "failed" with the first failing test, "passed", or "error" (a collection
    or usage error, no tests selected, a crash, a timeout) with what happened."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "--rootdir", repo,
           *(["-x"] if stop_first else []), *args]
    try:
        out = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "error", f"timed out after {timeout:.0f} s"
    text = out.stdout + out.stderr
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    if out.returncode == 1 and failed:
        return "failed", failed[0]
    if out.returncode == 0:
        return "passed", text.strip().splitlines()[-1] if text.strip() else ""
    if out.returncode < 0:
        return "failed", f"crash (signal {-out.returncode})"
    return "error", f"pytest exit {out.returncode}: {text[-1500:]}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated mutation ids")
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the unmutated copy")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary tree (its path is printed)")
    args = parser.parse_args(argv)

    mutations = load_mutations()
    problems = check_patterns(mutations)
    if problems:
        print("mutation run: the mutation list is out of step with the code:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {m["id"] for m in mutations}
        if unknown:
            print(f"mutation run: unknown ids {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        mutations = [m for m in mutations if m["id"] in wanted]
    if args.list:
        for m in mutations:
            print(f"{m['id']:26s} {m['file']:24s} {m['bug']}")
        return 0

    work = tempfile.mkdtemp(prefix="fusedlinear-mutation-")
    rows, status = [], 0
    try:
        shared = os.path.join(work, "numba-cache-unmutated-kernels")
        if not args.no_baseline:
            repo, site = build_tree(os.path.join(work, "tree"), None)
            env = environment(site, shared)
            check_import(site, env)
            selections = {tuple(m["tests"]) for m in mutations}
            t0 = time.perf_counter()
            for selection in sorted(selections):
                outcome, detail = run_tests(repo, env, list(selection), args.timeout, stop_first=False)
                if outcome != "passed":
                    print(f"mutation run: the UNMUTATED code does not pass {' '.join(selection)}: {detail}", file=sys.stderr)
                    return 2
            print(f"baseline: {len(selections)} selections pass on the unmutated copy ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
        for i, m in enumerate(mutations):
            # Every tree is built at the same path, so the Numba cache of one whose kernels/ is
            # unmutated (byte-identical files, same paths and times) is valid for the next such tree:
            # a mutation outside kernels/ shares it; one inside kernels/ gets a fresh, empty cache.
            dest = os.path.join(work, "tree")
            shutil.rmtree(dest, ignore_errors=True)
            repo, site = build_tree(dest, m)
            cache = os.path.join(work, f"numba-cache-{i:02d}") if m["file"].startswith("kernels/") else shared
            env = environment(site, cache)
            if i == 0:
                check_import(site, env)
            t0 = time.perf_counter()
            outcome, detail = run_tests(repo, env, m["tests"], args.timeout, stop_first=True)
            seconds = time.perf_counter() - t0
            verdict = {"failed": f"killed by {detail}", "passed": "SURVIVED", "error": f"ERROR: {detail}"}[outcome]
            if outcome != "failed":
                status = 1
            rows.append((m["id"], m["file"], verdict, seconds))
            print(f"[{i + 1}/{len(mutations)}] {m['id']}: {verdict.splitlines()[0]} ({seconds:.0f} s)", flush=True)
            if cache != shared:
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        if args.keep:
            print(f"trees kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nmutation results, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| mutation | file | result | s |\n| --- | --- | --- | --- |")
    for mid, file, verdict, seconds in rows:
        print(f"| {mid} | {file} | {verdict.splitlines()[0]} | {seconds:.0f} |")
    killed = sum(v.startswith("killed") for _, _, v, _ in rows)
    print(f"\n{killed}/{len(rows)} killed")
    return status


if __name__ == "__main__":
    sys.exit(main())
