def add_bench_arguments(p):
    pass
