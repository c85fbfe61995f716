"""Parquet data files, the format the Hugging Face Hub serves datasets in (a dataset repo's
data/train-00000-of-00001.parquet): records for sft, reward, dpo and rlhf (each row a record, its nested
lists and structs as JSON's lists and objects) and text for pretrain, eval and bpe (one column, read a
batch of rows at a time, so a corpus larger than memory streams). Read with pyarrow, the `[parquet]` extra."""
from pathlib import Path

from tritongpt.errors import UserError, first_line

SUFFIX = ".parquet"


def _pyarrow_parquet(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading .parquet files needs pyarrow: pip install pyarrow "
                        "(or pip install -e \".[parquet]\")") from None
    return pq


def _named(path: Path) -> str:
    """The path, and where it is a link (a Hub dataset's folder links each shard to the Hub cache's copy) the file
    it links to: the one to delete or fetch again when it is damaged."""
    return f"{path} (a link to {path.resolve()})" if path.is_symlink() else str(path)


def _open(path: Path, read=None):
    """The ParquetFile of path; read: the columns that will be read (None: all of them)."""
    pq = _pyarrow_parquet(path)
    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid and kin: a truncated or foreign file
        raise UserError(f"{_named(path)} is not a readable Parquet file ({first_line(e)})") from None
    # pyarrow writes two columns of one name without complaint; read back, a record keeps the last one's value and
    # a text column the first's: which was meant is unknown, so neither is guessed at (two columns of a name that
    # is not read, beside the text column, leave nothing to guess)
    names = f.schema_arrow.names
    twice = sorted({n for n in names if names.count(n) > 1 and (read is None or n in read)})
    if twice:
        raise UserError(f"{path}: several columns are named {', '.join(map(repr, twice))}: which one holds the data is "
                        "unclear; write the file with one column of each name")
    return f


def _damaged(path: Path, e: Exception, where: str) -> UserError:
    """A file whose footer reads but whose data does not (bytes damaged inside it: a bad copy or download, a
    codec this pyarrow lacks): pyarrow's OSError or ArrowInvalid, named as the file's, not a traceback."""
    return UserError(f"{_named(path)}: its data cannot be read{where} ({first_line(e)}); the file is damaged or in a "
                     "form this pyarrow cannot read: fetch or write it again")


def _values(path: Path, table, first_row: int = 0, one_column: bool = False) -> list:
    """table.to_pylist() (a Table's rows, or a RecordBatch's one column's values); a string holding bytes that are
    not UTF-8 (pyarrow checks none on reading: a writer that checked none wrote them) named by its row and column,
    as a text file's are, not Python's UnicodeDecodeError from inside pyarrow."""
    try:
        return (table.column(0) if one_column else table).to_pylist()
    except UnicodeDecodeError as e:
        error = e
    for name, column in zip(table.schema.names, table.columns):
        for i in range(len(column)):
            try:
                column[i].as_py()
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: row {first_row + i}: column {name!r} is not UTF-8 text (its byte {e.start}: "
                                f"{e.reason})") from None
    raise error  # no one value's: pyarrow's own, as it was


def _without_nulls(value):
    """A Parquet table has every column in every row, null where a record had none; and a list of structs has
    every struct's fields in each. Null fields are dropped, as the JSON record would not have them."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def parquet_records(path) -> list:
    """Every row of a .parquet file as a dict (column name -> value; null fields left out)."""
    path = Path(path)
    f = _open(path)
    try:
        table = f.read()
    except MemoryError:  # (pyarrow's ArrowMemoryError too): a file too large for this memory is not a damaged one
        raise
    except Exception as e:
        raise _damaged(path, e, "") from None
    return [_without_nulls(row) for row in _values(path, table)]


def parquet_texts(path, column: str, batch_rows: int = 1024):
    """(row number, value) of one column, a batch of rows at a time; the column must exist."""
    path = Path(path)
    f = _open(path, read=[column])
    names = f.schema_arrow.names
    if column not in names:
        raise UserError(f"{path}: no column {column!r} (found {names}); name the right one with --text-field")
    row, batches = 0, f.iter_batches(batch_size=batch_rows, columns=[column])
    while True:
        try:
            batch = next(batches, None)
        except MemoryError:
            raise
        except Exception as e:  # the rows before it were read (and yielded): where it stopped is named
            raise _damaged(path, e, f" from row {row} on") from None
        if batch is None:
            return
        for value in _values(path, batch, row, one_column=True):
            yield row, value
            row += 1
