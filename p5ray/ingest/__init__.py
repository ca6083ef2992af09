"""The parts of `p5ray prepare` (the stage itself is `p5ray/prepare.py`), each a plain module of
pyarrow / numpy functions testable without Ray:

    formats     which files, which format (`--format auto` sniffing), header checks
    readers     byte ranges with known first line numbers, gzip, Parquet row groups
    parsers     one raw line -> typed fields, or a quarantine reason
    accounting  rows in = kept + quarantined + dropped, by reason; quarantine/rows.csv
    events      a user's events in time order, duplicates, short users, leave-one-out split
    vocab       raw string ids -> contiguous indices (seeded hash order; --vocab-from)
    features    MovieLens / generic user and item feature tables
    outputs     the Parquet files of a prepared data directory, byte-stable
"""
