from wsi_scan.cli import main

main()
