"""Node settings: defaults, the TOML file, and one clear message per mistake."""

from __future__ import annotations

import pytest

from corevault import config


def test_defaults_live_under_var_lib() -> None:
    s = config.Settings()
    assert s.spool_dir == "/var/lib/corevault/spool"
    assert s.buildid_dir == "/var/lib/corevault/store"
    assert s.targets == {"volume", "vault"}


def test_missing_default_file_means_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("COREVAULT_CONFIG", raising=False)
    monkeypatch.setattr(config, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    assert config.load().source is None


def test_missing_explicit_file_is_an_error(tmp_path) -> None:
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(str(tmp_path / "absent.toml"))


def test_full_file(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'state_dir = "/srv/cv"\n[capture]\ntargets = ["vault"]\ntimeout = 30\nstorm_max = 3\nabort_stuck_fuse = false\n'
        '[spool]\nmax_size = "2G"\nkeep_free = "512M"\ncompression_level = 5\n'
        '[[rules]]\nexe = "/usr/bin/app*"\npattern = "/var/crash/core-%e-%p"\nmax_core_size = "1G"\n'
    )
    s = config.load(str(path))
    assert s.spool_dir == "/srv/cv/spool" and s.targets == {"vault"} and s.timeout == 30
    assert s.abort_stuck_fuse is False and config.Settings().abort_stuck_fuse is True
    assert s.spool_max_size == 2 << 30 and s.spool_keep_free == 512 << 20 and s.compression_level == 5
    [rule] = s.rules
    assert rule.matches("/usr/bin/app-server", "app-server", 0)
    assert not rule.matches("/usr/bin/other", "other", 0)
    assert rule.annotations == {
        "corevault.io/core-pattern": "/var/crash/core-%e-%p",
        "corevault.io/max-core-size": str(1 << 30),
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("state_dir = 3\n", "'state_dir' must be a non-empty string"),
        ('[capture]\ntargets = ["disk"]\n', "unknown target 'disk'"),
        ("[capture]\ntimeout = -1\n", "'timeout' must be a non-negative number"),
        ('[capture]\nabort_stuck_fuse = "yes"\n', "abort_stuck_fuse: expected true or false"),
        ('[spool]\nmax_size = "lots"\n', "is not a size"),
        ("[spool]\ncompression_level = 40\n", "use 1 to 19"),
        ("[spool]\nmaxsize = 1\n", "unknown key 'maxsize'"),
        ('[[rules]]\nexe = "x"\n', "needs a 'pattern'"),
        ('[[rules]]\npattern = "/a/b"\n', "needs at least one of"),
        ('[[rules]]\nexe = "x"\npattern = "a/b"\n', "not an absolute path"),
        ("[capture\n", "is not valid TOML"),
        ("[agent]\nanalysis_uids = 0\n", "analysis_uids: at least 1"),
        ("[agent]\nanalysis_processes = 4\n", "analysis_processes: at least 16"),
    ],
)
def test_mistakes_get_one_clear_message(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as err:
        config.load(str(path))
    assert message in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    ("text", "size"),
    [(512, 512), ("64K", 65536), ("1M", 1 << 20), ("2g", 2 << 30), ("1GiB", 1 << 30), ("1T", 1 << 40)],
)
def test_sizes(text: object, size: int) -> None:
    assert config.parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "-1", "1.5G", "G", True, None, -3])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(config.ConfigError):
        config.parse_size(bad)
