"""Docs that must match the code: the README's configuration table and the Lua key scheme."""

from __future__ import annotations

import re
from pathlib import Path

from gpuflow.config import Settings
from gpuflow.store.keys import Keys
from gpuflow.store.scripts import lib_source, script_source

ROOT = Path(__file__).resolve().parent.parent
CLIENT_SIDE = {"GPUFLOW_API_URL", "GPUFLOW_API_KEY"}


def test_readme_configuration_table_matches_settings() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1]
    documented = set(re.findall(r"^\| `(GPUFLOW_[A-Z0-9_]+)` \| `?([^`|]*)`? \|", table, re.M))
    names = {name for name, _ in documented}
    expected = {f"GPUFLOW_{n.upper()}" for n in Settings.model_fields}
    assert names == expected
    for name, default in documented:
        value = Settings.model_fields[name.removeprefix("GPUFLOW_").lower()].default
        shown = "unset" if value is None else str(value)
        assert default.strip() == shown, name
    assert set(re.findall(r"GPUFLOW_[A-Z0-9_]+", table)) >= CLIENT_SIDE


def test_lua_prelude_builds_the_same_key_names_as_keys_py() -> None:
    lib = lib_source()
    k = Keys("P:")
    pairs = {
        "k_task": (k.task("ID"), "'task:' .. id"),
        "k_queue": (k.queue(1, "VIP"), "'q:' .. t .. ':' .. tier"),
        "k_qstat": (k.qstat(1, "VIP"), "'qstat:' .. t .. ':' .. tier"),
        "k_tstat": (k.tstat(1), "'tstat:' .. t"),
        "k_status": (k.idx_status("QUEUED"), "'idx:status:' .. s"),
        "k_status_type": (k.idx_status_type("QUEUED", 1), "'idx:st:' .. s .. ':' .. t"),
        "k_gpu": (k.gpu("G"), "'gpu:' .. g"),
        "k_running": (k.gpu_running("G"), "'gpu:' .. g .. ':running'"),
    }
    for fn, (python_name, lua_expr) in pairs.items():
        assert f"local function {fn}(" in lib
        assert lua_expr in lib, fn
        assert python_name.startswith("P:")
    for attr, lua in (("leases", "'leases'"), ("delayed", "'delayed'"), ("events", "'events'")):
        assert getattr(k, attr) == f"P:{lua.strip(chr(39))}"
        assert f"P .. {lua}" in lib


def test_each_script_carries_the_part_of_the_prelude_it_uses() -> None:
    """Every lib definition a script's text names (directly or through another) is in its
    source, before the script; the rest is left out."""
    create, small = script_source("create_task"), script_source("set_gpu_status")
    assert "local function start_on(" in create and "local function waiting_gpu(" in create
    assert create.index("local function waiting_gpu(") < create.index("local function enqueue(")
    assert "local function enqueue(" not in small and "local function emit(" not in small
    assert small.startswith("local P = ARGV[1]")
    assert len(small) < len(lib_source()) // 10
