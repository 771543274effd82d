"""What a run leaves on disk: run directories written whole or not at all (``rundir``) and figures as pure
functions of arrays (``plots``)."""
