"""The repository stands alone: no file cites a document that is not in it, nobody needs to know how it was
developed to act on what it says, and every relative link in the markdown documentation resolves.

Three checks over every text file of the repository (``git ls-files`` with untracked, not-ignored files when
``.git`` exists, otherwise a walk of the tree that skips build outputs and data):

1. **Outside citations**: notes kept outside the repository (named by their file names), paths that leave
   the repository, and section citations that name no file. The facts behind such citations belong in
   ``docs/reference.md``; cite it as ``docs/reference.md §4.1``.
2. **Development-process words**: how, where and by whom the project was developed (the work periods and
   borrowed machines of its authors, the tools that hand them out, other people's runs, private issue numbers).
   Legitimate uses of the same words pass: pytest's fixture scope, Unix process groups started with
   ``start_new_session``, ``requests.Session``.
3. **Markdown links**: every relative link in README.md and docs/*.md names a file of the repository, and
   a fragment into a markdown file names one of its headings or explicit anchors.

Each failure names ``file:line`` and the offending text. The pattern definitions below are not scanned.
"""

from __future__ import annotations

import bisect
import os
import re
import subprocess
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve()

SKIP_DIRS = {".git", ".venv", "runs", "data", "build", "__pycache__", ".pytest_cache", ".whl", "node_modules"}
BINARY_SUFFIXES = {
    ".png",
    ".jpg",
    ".jpeg",
    ".gif",
    ".pdf",
    ".parquet",
    ".safetensors",
    ".pt",
    ".bin",
    ".npy",
    ".npz",
    ".mds",
    ".zst",
    ".gz",
    ".zip",
    ".tar",
    ".whl",
    ".so",
    ".pyc",
    ".model",
    ".ico",
}

# standalone: patterns begin (the lines up to the matching end marker are not scanned)
#: (what it is, regex); case-insensitive unless the pattern says otherwise
OUTSIDE = [
    (
        "design notes outside the repository",
        r"paper-notes|reference-implementation(?:\.md)?\b|reference-checkpoints|\banchors\.md\b|\benvironment\.md\b"
        r"|(?-i:\bDESIGN\b)|docs/DESIGN",
    ),
    ("path outside the repository", r"\.\./shared\b|(?<![\w.])/work/|\.library/|\bKINDS\.md\b"),
    (
        "section citation that names no file (cite docs/reference.md §N)",
        r"\b(?:paper|reference|notes|design)(?:'s|’s)?\s+(?:§|sections?\s+\d)|\bdesign (?:notes|brief)\b",
    ),
]
PROCESS = [
    ("work session", r"\bsessions?\b"),
    ("borrowed machine", r"\blent\b|\blend(?:s|ing)? (?:a |the )?(?:gpu|machine|device)"),
    (
        "development tool",
        r"\bdevice tool\b|\bdrawn for (?:a|the) (?:machine|gpu|device)\b|\bgive_back\b"
        r"|\bfiles_(?:at|fetch)\b|\bcarry\s*:?\s*\[\s*[\"']|\bcarry\b[^\n]{0,30}\.whl\b"
        r"|\bthe gpu image\b",
    ),
    ("development environment", r"\bworkplace\b|\b(?:this|the|our) (?:development|dev) (?:machine|box)\b"),
    (
        "other people's work",
        r"\b(?:other|another|two|three|fellow) (?:\w+ )?(?:engineers?|developers?|colleagues?)\b"
        r"|\bengineers?(?:'|’)",
    ),
    ("development helper", r"\bhelper (?:sessions?|agents?)\b|\bhelpers? (?:started|spawned)\b"),
    ("private issue number", r"(?<![\w/])(?:issues?|tickets?|bugs?|tasks?)\s+#\d+|\(#\d+\)"),
]
#: legitimate uses: a match of the named check that lies inside a match of this regex passes ("match"), or
#: any match on a line where this regex matches passes ("line")
ALLOW = {
    "work session": (
        "match",
        r"scope\s*=\s*[\"']session[\"']|\b(?:per |one |a )?test sessions?\b"
        r"|\bpytest sessions?\b|\bsessions? of (?:its|their) own\b|\bprocess sessions?\b"
        r"|\blogin sessions?\b|\w\.Session\b|\bSession\(|\bsession-scoped\b"
        r"|\b(?:a |in a )?new sessions?\b|\b(?:their|its) own sessions?\b",
    ),
    "private issue number": ("line", r"github\.com|[\w.-]+/[\w.-]+#\d+"),
}
#: what the checks must flag, and legitimate uses they must pass
FLAGGED_EXAMPLES = [
    "no GPU was available in the session that wrote the kernels",
    "this project's GPU sessions were single-GPU",
    "one command on a lent machine",
    "the device tool reported that this task was not drawn for a machine",
    "the machine was shared with two other engineers' test runs",
    "fixed in issue #12",
    "a regression (#34)",
    "A probe (paper-notes.md section 2.2)",
    "(reference-implementation.md §4.1 item 6)",
    "reference-checkpoints.md",
    "the layout of docs/DESIGN",
    "see ../shared/docs",
    "/work/.library/device/KINDS.md",
    "as in reference §3.1",
    "the paper's section 5 numbers",
    "measured on this workplace's machines",
    'carry: [".whl"]',
    "carry the wheels in `.whl/`",
    "Measured on this development machine",
    "the GPU image has no deepspeed",
]
PASSED_EXAMPLES = [
    '@pytest.fixture(scope="session")',
    "Built once per test session.",
    "loaded once per test session",
    "Popen(cmd, start_new_session=True)",
    "torchrun starts its ranks in sessions of their own",
    "s = requests.Session()",
    "TensorBoard event files",
    "docs/reference.md §4.2",
    "see docs/reference.md section 4",
    "tokens drawn uniformly from the vocabulary",
    "the reference's labels",
    "an equivalent run",
    "DeepSpeed's issue deepspeedai/DeepSpeed#5071",
    "the kernel design",
    "a LoRA helper function",
    "a process killed without its resource tracker",
    "performance engineering",
]
# standalone: patterns end

_OUTSIDE = [(name, re.compile(rx, re.I)) for name, rx in OUTSIDE]
_PROCESS = [(name, re.compile(rx, re.I)) for name, rx in PROCESS]
_ALLOW = {name: (scope, re.compile(rx, re.I)) for name, (scope, rx) in ALLOW.items()}


@lru_cache(maxsize=1)
def repo_files() -> tuple[Path, ...]:
    """Every file of the repository: tracked plus untracked-but-not-ignored (``git ls-files``), or a walk."""
    if (REPO / ".git").exists():
        try:
            out = subprocess.run(
                ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                cwd=REPO,
                capture_output=True,
                check=True,
                timeout=30,
            ).stdout
            names = sorted({n for n in out.decode("utf-8", "surrogateescape").split("\0") if n})
            return tuple(REPO / n for n in names if (REPO / n).is_file())
        except (OSError, subprocess.SubprocessError):
            pass  # no git executable: walk instead
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        found += [Path(root) / f for f in sorted(files)]
    return tuple(found)


@lru_cache(maxsize=1)
def text_files() -> tuple[tuple[Path, tuple[str, ...]], ...]:
    """``(path, lines)`` of every text file (binary files by suffix or content are left out)."""
    out = []
    for path in repo_files():
        if path.suffix.lower() in BINARY_SUFFIXES:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if b"\0" in data[:8192]:
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        out.append((path, tuple(text.splitlines())))
    return tuple(out)


def scanned_text(path: Path, lines: tuple[str, ...]) -> str:
    """The file's text, with this file's own pattern definitions blanked (line numbers are kept)."""
    if path.resolve() != SELF:
        return "\n".join(lines)
    out, skipping = [], False
    for line in lines:
        if line.startswith("# standalone: patterns begin"):
            skipping = True
        out.append("" if skipping else line)
        if line.startswith("# standalone: patterns end"):
            skipping = False
    return "\n".join(out)


def line_starts(text: str) -> list[int]:
    """Offsets of the first character of every line of ``text``."""
    return [0] + [m.end() for m in re.finditer("\n", text)]


def allowed(name: str, line: str, start: int, end: int) -> bool:
    """Whether the match ``line[start:end]`` of check ``name`` is one of its legitimate uses."""
    if name not in _ALLOW:
        return False
    scope, rx = _ALLOW[name]
    if scope == "line":
        return rx.search(line) is not None
    return any(m.start() <= start and end <= m.end() for m in rx.finditer(line))


def hits(checks) -> list[str]:
    """``file:line: check: match in line`` for every match of every check, one per check and line."""
    found = []
    for path, lines in text_files():
        rel = path.relative_to(REPO).as_posix()
        text = scanned_text(path, lines)
        starts = line_starts(text)
        for name, rx in checks:
            seen = set()
            for m in rx.finditer(text):
                no = bisect.bisect_right(starts, m.start())
                line = lines[no - 1]
                if no in seen or allowed(name, line, m.start() - starts[no - 1], m.end() - starts[no - 1]):
                    continue
                seen.add(no)
                found.append(f"{rel}:{no}: {name}: {m.group(0)!r} in {line.strip()[:160]!r}")
    return sorted(found, key=lambda f: (f.split(":")[0], int(f.split(":")[1])))


def flagged(line: str) -> list[str]:
    """Names of the checks that flag one line of text."""
    names = []
    for name, rx in _OUTSIDE + _PROCESS:
        if any(not allowed(name, line, m.start(), m.end()) for m in rx.finditer(line)):
            names.append(name)
    return names


def test_patterns_flag_what_they_should_and_pass_legitimate_uses():
    missed = [text for text in FLAGGED_EXAMPLES if not flagged(text)]
    wrongly = [(text, flagged(text)) for text in PASSED_EXAMPLES if flagged(text)]
    assert not missed, f"not flagged: {missed}"
    assert not wrongly, f"flagged although legitimate: {wrongly}"


def test_scan_finds_the_repository():
    rels = {p.relative_to(REPO).as_posix() for p, _ in text_files()}
    assert {"README.md", "docs/reference.md", "memtrain/cli.py", "tests/test_standalone.py"} <= rels


def test_no_citation_of_files_outside_the_repository():
    found = hits(_OUTSIDE)
    assert not found, (
        "files cite documents outside the repository (put the facts in docs/reference.md and "
        "cite its section):\n" + "\n".join(found)
    )


def test_no_development_process_words():
    found = hits(_PROCESS)
    assert not found, "files describe how the project was developed instead of what a user can do:\n" + "\n".join(found)


# ---------------------------------------------------------------------------------------------------------
# markdown links

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"`+[^`]*`+")
_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_ANCHOR = re.compile(r"<a\s+(?:[^>]*\s)?(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.I)


def markdown_lines(lines: tuple[str, ...]):
    """``(line number, line)`` outside fenced code blocks."""
    fenced = False
    for no, line in enumerate(lines, 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield no, line


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"<[^>]+>", "", heading)
    text = re.sub(r"[`*~]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(lines: tuple[str, ...]) -> set[str]:
    found, seen = set(), {}
    for _, line in markdown_lines(lines):
        found.update(_ANCHOR.findall(line))
        m = _HEADING.match(line)
        if m:
            s = slug(m.group(1))
            found.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return found


def test_markdown_links_resolve():
    docs = [
        p
        for p, _ in text_files()
        if p.relative_to(REPO).as_posix() == "README.md" or (p.parent == REPO / "docs" and p.suffix == ".md")
    ]
    assert docs, "no README.md or docs/*.md found"
    contents = {p.resolve(): lines for p, lines in text_files()}
    bad = []
    for doc in docs:
        rel = doc.relative_to(REPO).as_posix()
        for no, line in markdown_lines(contents[doc.resolve()]):
            for target in _LINK.findall(_CODE_SPAN.sub("", line)):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
                    continue
                path_part, _, fragment = target.partition("#")
                dest = (doc.parent / path_part).resolve() if path_part else doc.resolve()
                if path_part and (REPO not in dest.parents or not dest.exists()):
                    bad.append(f"{rel}:{no}: link to a missing file: {target!r}")
                    continue
                if fragment and dest.suffix == ".md" and dest.is_file():
                    lines = contents.get(dest) or tuple(dest.read_text(encoding="utf-8").splitlines())
                    if fragment not in anchors(lines):
                        bad.append(f"{rel}:{no}: link to a missing anchor: {target!r}")
    assert not bad, "broken links in the documentation:\n" + "\n".join(bad)
