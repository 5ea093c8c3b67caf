"""``bksdm serve``: the local demo page (app, HTTP server, page)."""
