"""The README is a front page that stays true: short, no lab-notebook figures, every command named, and every
path, API name, flag and glm-train line it shows exists in (or is accepted by) the code.

Each check is a function from README text to a list of problems, so that `test_checks_catch_a_lab_notebook`
can show each one failing on text of the kind the README must not hold.
"""

import importlib
import pathlib
import re
import shlex

import pytest


def _root() -> pathlib.Path:
    p = pathlib.Path(__file__).resolve().parent
    while not (p / "pyproject.toml").is_file():
        p = p.parent
    return p


ROOT = _root()
README = ROOT / "README.md"
MAX_LINES = 300

TOP = ("glm_jax", "train", "convert", "bench", "tests")
_URL = re.compile(r"https?://\S+")
_PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(TOP) + r")/[\w./-]*)")
_HASH = re.compile(r"(?<![0-9A-Za-z_])[0-9a-f]{7,40}(?![0-9A-Za-z_])")
_HOST = (
    re.compile(r"\b20\d\d-\d\d-\d\d\b"),  # a date
    re.compile(r"\bthis (?:[\w-]+ )?(?:host|cpu|machine's cores)\b", re.I),
    re.compile(r"\b\d+-core\b", re.I),
)
_OUTSIDE = ("../shared", "specs/", "DESIGN")


def _scripts() -> list[str]:
    """The names under [project.scripts] (read by hand: tomllib is Python 3.11+, the project supports 3.10)."""
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return re.findall(r"^([\w-]+)\s*=", section, re.M)


def _text(text: str) -> str:
    return _URL.sub("", text)


def _blocks(text: str) -> list[list[str]]:
    """The lines of each fenced code block."""
    out, cur = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if cur is None:
                cur = []
            else:
                out.append(cur)
                cur = None
        elif cur is not None:
            cur.append(line)
    return out


def length_problems(text):
    n = len(text.splitlines())
    return [f"{n} lines (at most {MAX_LINES})"] if n > MAX_LINES else []


def hash_problems(text):
    return [f"commit hash {m}" for m in _HASH.findall(_text(text)) if re.search(r"\d", m)]


def host_problems(text):
    return [f"host-bound or dated: {m.group(0)!r}" for r in _HOST for m in r.finditer(_text(text))]


def outside_problems(text):
    return [f"reference outside the repo: {s!r}" for s in _OUTSIDE if s in text]


def script_problems(text):
    return [f"console script {s} not named" for s in _scripts() if not re.search(rf"(?<![\w-]){s}(?![\w-])", text)]


def mentioned_paths(text) -> set[str]:
    paths = {m.rstrip(".,:;") for m in _PATH.findall(_text(text))}
    for block in _blocks(text):  # a tree: `root/` at column 0, its entries indented, comments after two spaces
        root = None
        for line in block:
            if re.match(r"^(?:" + "|".join(TOP) + r")/\s", line):
                root = line.split()[0]
            elif root and line.startswith("  ") and not line.startswith("   "):
                for name in re.split(r"\s{2,}", line.strip())[0].split(", "):
                    paths.add(root + name)
    return paths


def path_problems(text):
    missing = [p for p in sorted(mentioned_paths(text)) if not (ROOT / p).exists()]
    return [f"{p}: not in the repo" for p in missing]


def _resolve(dotted: str):
    obj = importlib.import_module(dotted.split(".")[0])
    parts = dotted.split(".")
    for i, part in enumerate(parts[1:], 1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


def api_names(text) -> set[str]:
    """glm_jax.a.b names, and X.f of every `from M import X` in a code block (e.g. infilling.layout)."""
    names = set(re.findall(r"\bglm_jax(?:\.\w+)+", _text(text)))
    for block in _blocks(text):
        body = "\n".join(block)
        for mod, name in re.findall(r"^from (glm_jax[\w.]*) import (\w+)", body, re.M):
            names.add(f"{mod}.{name}")
            names |= {f"{mod}.{name}.{attr}" for attr in re.findall(rf"\b{name}\.(\w+)", body)}
    return names


def api_problems(text):
    out = []
    for name in sorted(api_names(text)):
        try:
            _resolve(name)
        except (ImportError, AttributeError) as e:
            out.append(f"{name}: {type(e).__name__} {e}")
    return out


_CLI_SOURCES = {
    "glm-train": ["train/main.py", "train/launch.py"],  # launch.py: the gcloud / xpk flags launch-command prints
    "glm-convert": ["convert/cli.py"],
    "glm-generate": ["glm_jax/cli_generate.py"],
    "glm-eval": ["glm_jax/eval/cli.py"],
}


def _source(paths) -> str:
    return "\n".join((ROOT / p).read_text() for p in paths)


def command_lines(text) -> list[tuple[str, str]]:
    """(script, command line) for each console-script line of the code blocks, continuation lines joined."""
    out = []
    for block in _blocks(text):
        cmd = None
        for line in block:
            head = re.sub(r"(?:^|\s+)#.*$", "", line)  # a trailing comment
            first = head.split()[0] if head.split() else ""
            if first in _CLI_SOURCES:
                cmd = [first, head]
                out.append(cmd)
            elif cmd and line.startswith(" ") and head.strip():
                cmd[1] += " " + head.strip()
            else:
                cmd = None
    return [(c, line) for c, line in out]


def flag_problems(text):
    """Flags on a command's line are its argparse options; flags in prose are some CLI's or a bench script's."""
    out = []
    on_lines = set()
    for cmd, line in command_lines(text):
        src = _source(_CLI_SOURCES[cmd])
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", line):
            on_lines.add(flag)
            if f'"{flag}"' not in src:
                out.append(f"{cmd} has no option {flag}")
    every = _source([p for ps in _CLI_SOURCES.values() for p in ps] + sorted(str(p) for p in ROOT.glob("bench/*.py")))
    for line in _text(text).splitlines():
        if line.lstrip().startswith("pip "):
            continue
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", line):
            if flag not in on_lines and f'"{flag}"' not in every:
                out.append(f"no command or bench script has the option {flag}")
    return out


def train_problems(text):
    """Every glm-train line the README shows parses, and its config and keys are accepted by train.config."""
    from train.config import TrainConfigError, build
    from train.main import launch_parser, parse_args

    out = []
    for cmd, line in command_lines(text):
        argv = shlex.split(line.replace("\\", " "))[1:]
        if cmd != "glm-train" or argv[:1] == ["verify"] or re.search(r"\[(?:--|key=)", line):
            continue  # the synopsis in the command reference
        try:
            args = launch_parser().parse_intermixed_args(argv[1:]) if argv[0] == "launch-command" else parse_args(argv)
            build(args.config, args.overrides)
        except (TrainConfigError, SystemExit) as e:
            out.append(f"{line!r}: {e}")
    return out


CHECKS = [
    length_problems,
    hash_problems,
    host_problems,
    outside_problems,
    script_problems,
    path_problems,
    api_problems,
    flag_problems,
    train_problems,
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_readme(check):
    assert check(README.read_text()) == []


LAB_NOTEBOOK = (
    "# notes\n"
    + "figure line\n" * MAX_LINES
    + "Measured at 876c16c on this 2-core host (2026-12-06); see ../shared/DESIGN.md §3 and specs/CHATGLM_ARCH.md.\n"
    "Commands: glm-train, glm-convert, glm-generate. Code: glm_jax/no_such_module.py.\n"
    "```\nglm_jax.no_such_name()\nglm-convert to-jax A B --no-such-flag\nglm-train --config tiny no_such_key=1\n```\n"
)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_checks_catch_a_lab_notebook(check):
    """Each check flags text of the kind the front page must not hold (the old README held most of it)."""
    assert check(LAB_NOTEBOOK)
