def add_score_arguments(p):
    pass
