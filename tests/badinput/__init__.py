"""Bad input over real sockets against a real engine process (issue 5, "Bad input")."""
