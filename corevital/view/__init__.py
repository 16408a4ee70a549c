"""`corevital view`: an interactive viewer of every trace of the given job and sweep dirs.

    data.py    the traces, read lazily from the jobs' Parquet files with DuckDB
    server.py  the local web server: the app's files and a JSON API
    bundle.py  the same app as a static folder that opens from file://
    static/    the app itself (index.html, app.js, app.css: no dependencies, no build step)

docs/view.md says what each page shows and how it is tested.
"""
