"""Two deliberately broken hsd plugins, for testing that hsd skips them and keeps serving."""
