"""pytest entry point of the test kit (fixtures are added as the kit grows)."""
