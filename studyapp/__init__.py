"""Django project and app of the perceptual-study platform (JND studies with crowdworkers)."""
