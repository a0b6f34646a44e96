from wsi_scan.cli import main

if __name__ == "__main__":  # Dask process workers re-import the main module
    main()
