"""hsd's test kit: the simulator, real peers and a kTLS record checker, for hsd and for plugin authors."""
