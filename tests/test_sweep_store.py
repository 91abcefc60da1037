"""The sweep directory on disk: where each cell lives when its settings change, and what a sweep
may write into (no JAX: files only)."""

from __future__ import annotations

import hashlib
import json

import pytest
from sweep_helpers import prepared, write_sweep

from nstjax import config
from nstjax.errors import UserError
from nstjax.sweep import store


def test_each_config_finds_its_own_directory(tmp_path):
    p = write_sweep(tmp_path / "s.yaml", axes={"seed": [0]})
    _, cells, _ = prepared(p)
    c = cells[0]
    out = tmp_path / "out"
    (out / "cells").mkdir(parents=True)
    assert store.locate(out, cells) == [] and c.dir == "seed-0"
    (out / "cells" / "seed-0").mkdir()
    (out / "cells" / "seed-0" / "config.yaml").write_text("other settings")
    digest = hashlib.sha1(config.dump(c.cfg).encode()).hexdigest()[:8]
    assert store.locate(out, cells) == [c] and c.dir == f"seed-0-{digest}"
    hashed = out / "cells" / c.dir
    hashed.mkdir()
    (hashed / "config.yaml").write_text(config.dump(c.cfg))
    (out / "cells" / "seed-0").rename(out / "cells" / "elsewhere")  # the plain name is free
    store.locate(out, cells)
    assert c.dir == hashed.name  # found again by its config
    (hashed / "config.yaml").write_text("yet other settings")
    (out / "cells" / "seed-0").mkdir()
    assert store.locate(out, cells) == [c] and c.dir == f"seed-0-{digest}-2"


def test_only_a_sweeps_own_directory_is_claimed(tmp_path):
    p = write_sweep(tmp_path / "s.yaml", axes={"seed": [0]})
    sw, _, _ = prepared(p)
    new = tmp_path / "new"
    store.claim(new, sw)
    mark = json.loads((new / "sweep.json").read_text())
    assert mark == {"format": "nstjax-sweep/1", "name": "s", "file": str(p)}
    store.claim(new, sw)  # its own: fine
    other = prepared(write_sweep(tmp_path / "t.yaml", axes={"seed": [0]}))[0]
    with pytest.raises(UserError, match="holds the sweep 's', not 't'"):
        store.claim(new, other)
    empty = tmp_path / "empty"
    empty.mkdir()
    store.claim(empty, sw)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        store.claim(tmp_path / "file", sw)
    legacy = tmp_path / "legacy"  # a sweep.json from before the format mark
    legacy.mkdir()
    (legacy / "sweep.json").write_text(json.dumps({"name": "s", "dims": [], "groups": [],
                                                   "cells": []}))
    store.claim(legacy, sw)
