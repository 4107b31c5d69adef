"""bandits: an exact-optimum simulation bench for the surrogate-loss theory of reclight."""
