"""The online engine: sources, regularizer, engine, online adaptation and state store."""
