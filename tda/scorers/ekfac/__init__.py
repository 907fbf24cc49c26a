"""EK-FAC influence functions: the factors, their fitting passes, the features and the scorer."""
