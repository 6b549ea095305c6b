"""Install or remove the nightly scaling run with the site's own periodic-job mechanism.

Slurm sites use ``scrontab`` (Slurm's cron: the job runs inside the allocation it describes with
``#SCRON`` lines); where the Slurm client has none (Debian's 22.05 build lacks it) and on PBS and local
sites, the user's ``crontab`` starts the run from a login node. Both tables are edited the same way: our
block is marked by a tag line naming the site and run directory, so installing twice replaces it and
removing it leaves every other entry alone. Centres whose CI runners submit batch jobs can instead use the
scheduled-pipeline snippet in README.md.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TAG = "# matris-janus nightly scaling"


def mechanism(site) -> str:
    if site.scheduler == "slurm" and shutil.which("scrontab"):
        return "scrontab"
    if shutil.which("crontab"):
        return "crontab"
    raise RuntimeError("neither scrontab nor crontab is available here to schedule the nightly run")


def block(ctx, tool: str) -> list[str]:
    """The lines we own in the table: tag, scheduler directives, the command."""
    site = ctx.site
    parsl_run = str(Path(sys.executable).parent / "parsl-run")
    workflow = str(Path(ctx.workflow_file).resolve())
    parts = [parsl_run, workflow, "--site", site.name, "--run-dir", str(ctx.run_dir)]
    if ctx.config_file is not None:
        parts += ["--config", str(Path(ctx.config_file).resolve())]
    for assignment in ctx.assignments:
        parts += ["--set", assignment]
    log = ctx.run_dir / "nightly.log"
    command = f"cd {shlex.quote(str(Path.cwd()))} && {shlex.join(parts)} >> {shlex.quote(str(log))} 2>&1"
    command = table_safe(command, tool)
    lines = [f"{TAG} site={site.name} run_dir={ctx.run_dir}"]
    if tool == "scrontab":
        lines.append("#SCRON --job-name=matris-scaling-nightly")
        if site.account:
            lines.append(f"#SCRON --account={site.account}")
        if site.partition:
            lines.append(f"#SCRON --partition={site.partition}")
        lines.append(f"#SCRON --time={site.walltime}")
    lines.append(f"{ctx.run.scaling.schedule_time} {command}")
    return lines


def table_safe(command: str, tool: str) -> str:
    """cron turns an unescaped ``%`` into a newline and a table line cannot hold one: escape ``%`` for
    crontab; refuse both for scrontab, whose handling of ``%`` Slurm does not document."""
    if "\n" in command or "\r" in command:
        raise RuntimeError("a newline in the run directory, --config or --set cannot go into a cron table")
    if "%" not in command:
        return command
    if tool == "crontab":
        return command.replace("%", "\\%")
    raise RuntimeError(
        f"'%' in the run directory, --config or --set cannot go into {tool}'s table; remove it"
    )


def read_table(tool: str) -> list[str]:
    result = subprocess.run([tool, "-l"], capture_output=True, text=True)
    if result.returncode != 0:
        if "no crontab" in result.stderr.lower() or "no scrontab" in result.stderr.lower():
            return []
        raise RuntimeError(f"{tool} -l failed: {result.stderr.strip()}")
    return result.stdout.splitlines()


def without_block(lines: list[str], tag_line: str) -> list[str]:
    """Drop our tagged block (tag line up to and including its command line)."""
    out, skipping = [], False
    for line in lines:
        if line == tag_line:
            skipping = True
            continue
        if skipping:
            if not line.startswith("#"):
                skipping = False
            continue
        out.append(line)
    return out


def write_table(tool: str, lines: list[str]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".cron", delete=False) as handle:
        handle.write("".join(line + "\n" for line in lines))
    try:
        result = subprocess.run([tool, handle.name], capture_output=True, text=True)
    finally:
        Path(handle.name).unlink(missing_ok=True)
    if result.returncode != 0:
        raise RuntimeError(f"{tool} refused the new table: {result.stderr.strip()}")


def apply(ctx, action: str) -> int:
    """``action`` is ``nightly`` (install or replace) or ``off`` (remove); both idempotent."""
    tool = mechanism(ctx.site)
    ours = block(ctx, tool)
    current = read_table(tool)
    kept = without_block(current, ours[0])
    if action == "nightly":
        write_table(tool, kept + ours)
        print(f"scheduled with {tool}: {ours[-1]}")
    else:
        if kept != current:
            write_table(tool, kept)
            print(f"removed the nightly scaling run of {ctx.run_dir} from {tool}")
        else:
            print(f"no nightly scaling run of {ctx.run_dir} in {tool}; nothing to remove")
    return 0
