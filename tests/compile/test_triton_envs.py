"""The admitted Triton versions come from pyproject.toml, and each gets its own small environment."""
import importlib.util
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _load():
    spec = importlib.util.spec_from_file_location("fastsft_compile_triton_envs", os.path.join(HERE, "triton_envs.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


triton_envs = _load()


def test_admitted_minors_follow_the_pyproject_bounds(tmp_path):
    assert triton_envs.admitted_minors() == ["3.6", "3.7", "3.8", "3.9"]
    other = tmp_path / "pyproject.toml"
    other.write_text('dependencies = [\n  "torch>=2.11",\n  "triton>=3.7,<3.9",\n]\n')
    assert triton_envs.admitted_minors(str(other)) == ["3.7", "3.8"]
    other.write_text('dependencies = ["triton>=3.6,<4.1"]\n')
    with pytest.raises(ValueError, match="span majors"):
        triton_envs.admitted_minors(str(other))
    other.write_text('dependencies = ["triton"]\n')
    with pytest.raises(ValueError, match="no 'triton>=A.B,<C.D' requirement"):
        triton_envs.admitted_minors(str(other))


def test_the_running_version_needs_no_install(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTSFT_TRITON_ENVS", str(tmp_path))
    running = triton_envs.minor_of(triton_envs.running_version())
    env = triton_envs.env_for(running, base={"PYTHONPATH": "/x", "TRITON_INTERPRET": "1", "A": "b"})
    assert env["PYTHONPATH"] == "/x" and "TRITON_INTERPRET" not in env and env["A"] == "b"
    assert not os.listdir(tmp_path)


def test_another_version_is_put_first_on_the_path(monkeypatch, tmp_path):
    """An installed cache folder is reused (no pip); its folder goes before the caller's PYTHONPATH."""
    monkeypatch.setenv("FASTSFT_TRITON_ENVS", str(tmp_path))
    folder = tmp_path / "3.1"
    (folder / "triton").mkdir(parents=True)
    (folder / "triton" / "__init__.py").write_text("__version__ = '3.1.7'\n")
    (folder / "triton-3.1.7.dist-info").mkdir()
    calls = []
    monkeypatch.setattr(triton_envs.subprocess, "run", lambda *a, **k: calls.append(a))
    env = triton_envs.env_for("3.1", base={"PYTHONPATH": "/x"})
    assert env["PYTHONPATH"] == f"{folder}{os.pathsep}/x" and not calls


def test_a_missing_version_is_installed_once_with_pip_target(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTSFT_TRITON_ENVS", str(tmp_path))
    calls = []

    def fake_pip(argv, **kwargs):  # what pip --target leaves behind
        calls.append(argv)
        target = argv[argv.index("--target") + 1]
        os.makedirs(os.path.join(target, "triton"))
        open(os.path.join(target, "triton", "__init__.py"), "w").close()
        os.makedirs(os.path.join(target, "triton-3.1.9.dist-info"))
        return triton_envs.subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(triton_envs.subprocess, "run", fake_pip)
    folder = triton_envs.ensure("3.1", log=lambda _: None)
    assert folder == str(tmp_path / "3.1") and triton_envs._installed(folder) == "3.1.9"
    assert calls[0][-1] == "triton==3.1.*" and "--no-deps" in calls[0]
    assert triton_envs.ensure("3.1", log=lambda _: None) == folder and len(calls) == 1  # cached
    monkeypatch.setattr(triton_envs.subprocess, "run", lambda argv, **k: triton_envs.subprocess.CompletedProcess(
        argv, 1, "", "ERROR: No matching distribution found for triton==3.2.*"))
    with pytest.raises(RuntimeError, match="No matching distribution"):
        triton_envs.ensure("3.2", log=lambda _: None)
    assert not (tmp_path / "3.2").exists()


def test_compile_report_refuses_a_version_pyproject_does_not_admit(capsys):
    path = os.path.join(os.path.dirname(os.path.dirname(HERE)), "benchmarks", "compile_report.py")
    spec = importlib.util.spec_from_file_location("fastsft_compile_report_cli", path)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    with pytest.raises(SystemExit) as exc:
        report.main(["--triton", "3.5"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == ("benchmarks.compile_report: --triton 3.5: 3.5 not among the admitted "
                                               "versions 3.6, 3.7, 3.8, 3.9 (pyproject.toml)")
    with pytest.raises(SystemExit) as exc:
        report.main(["--triton", "3.6,3.9", "--json", "one.json"])
    assert exc.value.code == 2 and "{minor}" in capsys.readouterr().err
