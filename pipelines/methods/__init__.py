"""How each scorer of ``tda run`` is wired (its ``Method`` registration) and the methods that
retrain or fit their own state (EK-FAC, MAGIC, AirRep)."""
