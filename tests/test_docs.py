"""The documents the code points to are in the repository and say what the code does: every compat fix is in
docs/llava-compat.md and counted right in the README, every test the docs name as a guard exists, every document a
file refers to exists, and nothing reads a folder outside the repository."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NUMBERS = {7: "seven", 8: "eight", 9: "nine", 10: "ten", 11: "eleven", 12: "twelve"}
SKIP = {".git", ".venv", "runs", "build", "__pycache__", ".hypothesis", "downloads", "data"}


def text_files():
    for path in REPO.rglob("*"):
        if path.is_file() and not SKIP & set(path.relative_to(REPO).parts) and path.suffix in (
                ".py", ".md", ".sh", ".toml", ".txt", ".json", ".cfg", ".patch", ".jsonl", ""):
            yield path


def test_every_compat_fix_is_documented_and_the_readme_counts_them():
    from llava_getok.llava.compat import FIXES

    doc = (REPO / "docs" / "llava-compat.md").read_text()
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \|", doc, flags=re.M)
    assert [name for _, name in rows] and sorted(name for _, name in rows) == sorted(f.name for f in FIXES)
    assert f"the {NUMBERS[len(FIXES)]} places" in (REPO / "README.md").read_text()


def test_every_test_the_docs_name_exists():
    named = set()
    for doc in ("pitfalls.md", "llava-compat.md"):
        text = (REPO / "docs" / doc).read_text()
        named |= set(re.findall(r"`(test_\w+\.py)(?:::(\w+))?", text))
    assert len(named) > 20
    for file, name in named:
        source = (REPO / "tests" / file).read_text()
        assert not name or re.search(rf"(def|class) {name}\b", source), f"{file}::{name}"


def test_documents_referred_to_exist_and_nothing_reads_outside_the_repository():
    outside = re.compile("|".join([r"\.\./" + "shared", "/shared/" + "data", "GETOK_" + "SHARED"]))
    for path in text_files():
        text = path.read_text(errors="replace")
        assert not outside.search(text), path
        for doc in set(re.findall(r"\b(pitfalls|llava-compat)\.md", text)):
            assert (REPO / "docs" / f"{doc}.md").is_file(), (path, doc)
