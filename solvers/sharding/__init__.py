"""The intra-op sharding ILP: per layer kind and TP size, the cheapest placement of every op over the TP axis.

``strategies.solve_layer_sharding`` is the entry point: ``layer_graph`` turns a layer into
the graph the ILP sees, ``op_rules``/``op_strategies``/``view_rules`` list each op's
strategies, ``placement`` prices a change of placement, ``sharding_problem`` and
``sharding_ilp`` build and solve the ILP (PuLP), and ``layer_result`` is the answer.
"""
