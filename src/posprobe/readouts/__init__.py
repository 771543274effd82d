"""Features to position maps: the readouts (``pem``: the paper's position encoding module; ``linear``: the exact
ridge probe), their training (``train``: schedules and profiles; ``joint``: many readouts in one pass;
``convergence``: whether training finished), the ``engine`` every command trains and scores through, and the
scikit-learn-shaped ``probe``."""
