"""The documentation site against the code: the module map in docs/how-it-works.md lists exactly
the package's modules, the API reference (docs/api.md) exactly `nstjax.__all__`, and every
relative link in README.md resolves."""

import re
from pathlib import Path

import nstjax

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "nstjax"


def _section(page: Path, heading: str) -> str:
    """The text of `## heading` in `page`, up to the next `## ` heading."""
    text = page.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end >= 0 else len(text)]


def module_map() -> list[str]:
    """The module column of the "Module map" table, in the page's order."""
    rows = [line for line in _section(ROOT / "docs/how-it-works.md", "Module map").splitlines()
            if line.startswith("| `")]
    return [re.match(r"\| `([^`]+)` \|", line).group(1) for line in rows]


def package_modules() -> set[str]:
    """Every .py file of the package, as a path relative to nstjax/ (found on disk)."""
    return {p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py")
            if "__pycache__" not in p.parts}


def test_module_map_lists_exactly_the_package_modules():
    listed = module_map()
    assert len(listed) == len(set(listed)), "a module is listed twice"
    on_disk = package_modules()
    assert set(listed) == on_disk, (
        f"missing from docs/how-it-works.md: {sorted(on_disk - set(listed))}; "
        f"listed but not in nstjax/: {sorted(set(listed) - on_disk)}")


def test_module_map_parser_sees_a_missing_module(tmp_path):
    """The check can fail: a module map without `run.py` differs from the package."""
    listed = set(module_map()) - {"run.py"}
    assert listed != package_modules() and "run.py" in package_modules() - listed


def test_api_reference_lists_exactly_all():
    text = (ROOT / "docs/api.md").read_text()
    heads = re.findall(r"^## `nstjax\.(\w+)`$", text, re.M)
    assert len(heads) == len(set(heads))
    assert set(heads) == set(nstjax.__all__) - {"__version__"}
    # each heading is documented by a mkdocstrings directive naming an object
    for name, block in zip(heads, re.split(r"^## `nstjax\.\w+`$", text, flags=re.M)[1:]):
        assert re.search(r"^::: nstjax\.[\w.]+$", block, re.M), name


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text()
    links = [t for t in re.findall(r"\]\(([^)]+)\)", text) if "://" not in t]
    assert links, "README.md links to the docs"
    for target in links:
        path = target.split("#")[0]
        assert (ROOT / path).exists(), f"README.md links to missing {target}"


def test_readme_test_command_is_the_ci_command():
    """CI runs the README's test command; both must say the same."""
    cmd = "python -m pytest -q -n 2 tests"
    assert cmd in (ROOT / "README.md").read_text()
    assert cmd in (ROOT / ".ci/run").read_text()


SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "demo")
SHARED = ROOT.parent / "shared" / "images"  # the paintings beside the checkout, where present


def test_shipped_configs_have_a_measured_header_and_load():
    """Every shipped config and sweep: a header in big_vision's form (what it is, `# Run:` with
    its own path, `# Expected:`), no unmeasured accelerator claims, and it loads."""
    from nstjax import config, sweep

    assert len(SHIPPED) >= 30
    for p in SHIPPED:
        rel = p.relative_to(ROOT).as_posix()
        head = "\n".join(ln for ln in p.read_text().splitlines() if ln.startswith("#"))
        assert p.read_text().startswith("# "), rel
        assert "# Run:" in head and "# Expected:" in head, rel
        assert rel in head.split("# Run:", 1)[1], f"{rel}: its Run line names another file"
        assert not re.search(r"H100|H200|TPU", head) and "README" not in head, rel
        if "/shared/" in p.read_text() and not SHARED.is_dir():
            continue  # reads ../shared/images beside the checkout, which is not here
        if "/sweeps/" in rel:
            cells = sweep.expand(sweep.load(p))
            assert cells and all(c.cfg is not None for c in cells), (rel, cells[0].error)
        else:
            assert config.load(p).styles, rel
