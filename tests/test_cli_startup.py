"""The command line starts fast: `run --help` and `serve --help` import neither the engine's nor the server's stacks."""
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "pyarrow", "fastapi", "uvicorn", "triton")


def test_the_command_line_imports_no_heavy_module_until_a_command_runs():
    probe = ("import sys; from click.testing import CliRunner; from pagedbatch.cli import cli; "
             "r = CliRunner().invoke(cli, ['run', '--help']); assert r.exit_code == 0, r.output; "
             "r = CliRunner().invoke(cli, ['serve', '--help']); assert r.exit_code == 0, r.output; "
             f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"imported at start-up: {done.stdout.strip()}"


def test_the_server_package_still_exports_its_names_on_first_use():
    import pagedbatch.server as server

    assert {n: callable(getattr(server, n)) for n in server.__all__} == dict.fromkeys(server.__all__, True)
    with pytest.raises(AttributeError, match="no_such_name"):
        server.no_such_name
