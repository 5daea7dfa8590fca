"""The one stream lifecycle: generation, sinks, readers, the registry that drains them.

``lifecycle`` starts every stream; ``generation`` runs one from subscription
to its one end; ``sinks`` hold what it made for its readers (the journal,
one client's bounded backlog, or a collected answer); ``readers`` write that
to a client's connection; ``registry`` keeps the running ones and drains them.
"""
