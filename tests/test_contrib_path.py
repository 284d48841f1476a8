"""`xmpp-dane-proxy contrib-path [BACKEND]`: where the installed backend modules are (issue 14)."""
from __future__ import annotations

from pathlib import Path

import proxy.contrib_path as contrib_path


def test_prints_the_directory_with_the_prosody_module(cli):
    code, out, err = cli("contrib-path", "prosody")
    assert code == 0, err
    assert (Path(out.strip()) / "mod_s2s_dane_proxy.lua").is_file()
    code, out, _ = cli("contrib-path")
    assert code == 0 and (Path(out.strip()) / "prosody").is_dir()


def test_unknown_backend_is_bad_input(cli):
    code, out, err = cli("contrib-path", "openfire")
    assert code == 2 and out == ""
    assert "no modules for 'openfire' (there are: " in err and "prosody" in err


def test_installed_layout_is_preferred(tmp_path, monkeypatch):
    # A wheel installs contrib/ as proxy/contrib beside the modules.
    (tmp_path / "proxy" / "contrib" / "prosody").mkdir(parents=True)
    monkeypatch.setattr(contrib_path, "_PACKAGE", tmp_path / "proxy")
    assert contrib_path.contrib_dir() == tmp_path / "proxy" / "contrib"
    assert contrib_path.backends() == ["prosody"]
