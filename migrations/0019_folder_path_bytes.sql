-- A folder's subfolders are the folders whose path is in ['p/', 'p0') in
-- byte order, as 0018 found a folder's files. Deleting an account asks it
-- for every folder the user owns (does anyone else keep something under
-- it?), and a home folder's existence asks it too; with only the unique
-- (bucket_id, path) index, in the database's collation, each asking
-- scanned the bucket's folders. This C-collated index serves the range.

CREATE INDEX IF NOT EXISTS folders_bucket_path_bytes
    ON public.folders (bucket_id, path COLLATE "C");
