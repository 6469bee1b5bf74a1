"""Stand-ins for GPU-only modules, installed by tests through ``monkeypatch.setitem(sys.modules, ...)``."""
