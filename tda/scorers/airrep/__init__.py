"""AirRep-style attribution: the learned encoder head and its scorer."""
