"""The application layer: the `cascade` command line (`app.cli`) and the HTTP server
(`app.server`). The one package that imports both the library (`cascade`) and the
benchmark (`bench`); neither imports it."""

__all__: list[str] = []
