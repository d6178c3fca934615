#include "common/region.hpp"

#include <daxctl/libdaxctl.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>
#include <utility>

#include "common/error.hpp"

namespace cbd {
namespace {

// RAII for a file descriptor used only while mapping.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

bool is_pci_resource(const std::string& path) {
  char resolved[PATH_MAX];
  if (!::realpath(path.c_str(), resolved)) return false;
  std::string real(resolved);
  auto slash = real.rfind('/');
  std::string name = real.substr(slash + 1);
  return real.rfind("/sys/devices/", 0) == 0 && name.rfind("resource", 0) == 0 && name.size() > 8 &&
         name.find_first_not_of("0123456789", 8) == std::string::npos;
}

std::string dax_name(const std::string& path, const struct stat& st) {
  // /dev/daxX.Y and its sysfs node share the major:minor; libdaxctl names
  // devices "daxX.Y".
  (void)path;
  char link[PATH_MAX];
  std::string sys = "/sys/dev/char/" + std::to_string(major(st.st_rdev)) + ":" + std::to_string(minor(st.st_rdev));
  ssize_t n = ::readlink(sys.c_str(), link, sizeof link - 1);
  if (n <= 0) return {};
  link[n] = 0;
  std::string target(link);
  return target.substr(target.rfind('/') + 1);
}

}  // namespace

const char* region_kind_name(RegionKind kind) {
  switch (kind) {
    case RegionKind::File: return "file";
    case RegionKind::DeviceDax: return "device-dax";
    case RegionKind::PciResource: return "pci-resource";
  }
  return "?";
}

DaxGeometry query_device_dax(const std::string& path) {
  struct stat st{};
  if (::stat(path.c_str(), &st) != 0 || !S_ISCHR(st.st_mode)) return {};
  std::string name = dax_name(path, st);
  if (name.empty()) return {};
  DaxGeometry result;
  struct daxctl_ctx* ctx = nullptr;
  if (daxctl_new(&ctx) != 0) return {};
  struct daxctl_region* region;
  daxctl_region_foreach(ctx, region) {
    struct daxctl_dev* dev;
    daxctl_dev_foreach(region, dev) {
      const char* devname = daxctl_dev_get_devname(dev);
      if (devname && name == devname) {
        result.size = daxctl_dev_get_size(dev);
        result.alignment = daxctl_dev_get_align(dev);
        if (result.alignment == 0) result.alignment = daxctl_region_get_align(region);
      }
    }
  }
  daxctl_unref(ctx);
  return result;
}

Region Region::open(const std::string& path, const RegionOptions& options) {
  Fd fd;
  int flags = O_RDWR | O_CLOEXEC;
  struct stat st{};
  bool exists = ::stat(path.c_str(), &st) == 0;
  if (!exists) {
    if (!options.create)
      throw Error("transport " + path + ": does not exist — create it with `cbd-proxy format transport=" + path +
                  " size=256M` or point transport= at a /dev/daxX.Y device");
    flags |= O_CREAT;
  }
  fd.fd = ::open(path.c_str(), flags, 0600);
  if (fd.fd < 0) throw_errno("transport " + path + ": open");
  if (::fstat(fd.fd, &st) != 0) throw_errno("transport " + path + ": fstat");

  RegionKind kind;
  std::uint64_t size = 0;
  std::uint64_t alignment = 0;
  if (S_ISREG(st.st_mode)) {
    kind = is_pci_resource(path) ? RegionKind::PciResource : RegionKind::File;
    size = static_cast<std::uint64_t>(st.st_size);
    if (kind == RegionKind::File && options.size > size) {
      if (::ftruncate(fd.fd, static_cast<off_t>(options.size)) != 0)
        throw_errno("transport " + path + ": resize to " + std::to_string(options.size));
      size = options.size;
    }
  } else if (S_ISCHR(st.st_mode)) {
    kind = RegionKind::DeviceDax;
    DaxGeometry dax = query_device_dax(path);
    if (dax.size == 0)
      throw Error("transport " + path + ": a character device that libdaxctl does not know as device-DAX — "
                  "use /dev/daxX.Y in devdax mode (daxctl reconfigure-device --mode=devdax)");
    size = dax.size;
    alignment = dax.alignment;
  } else {
    throw Error("transport " + path +
                ": not a regular file, device-DAX device or PCI resource file — cbd maps only those");
  }
  if (size == 0)
    throw Error("transport " + path + ": empty — give size= to create it (e.g. `cbd-proxy format transport=" + path +
                " size=256M`)");
  // Device-DAX refuses mappings whose length is not a multiple of its
  // alignment (2 MiB or 1 GiB pages); map the aligned part only.
  if (alignment > 1) size -= size % alignment;

  void* base = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.fd, 0);
  if (base == MAP_FAILED) throw_errno("transport " + path + ": mmap " + std::to_string(size) + " bytes");
  try {
    return Region(path, kind, static_cast<std::byte*>(base), size);
  } catch (...) {
    ::munmap(base, size);
    throw;
  }
}

Region::Region(Region&& other) noexcept
    : path_(std::move(other.path_)), kind_(other.kind_), base_(std::exchange(other.base_, nullptr)),
      size_(std::exchange(other.size_, 0)), fault_guard_(std::move(other.fault_guard_)) {}

Region& Region::operator=(Region&& other) noexcept {
  if (this != &other) {
    unmap();
    path_ = std::move(other.path_);
    kind_ = other.kind_;
    base_ = std::exchange(other.base_, nullptr);
    size_ = std::exchange(other.size_, 0);
    fault_guard_ = std::move(other.fault_guard_);
  }
  return *this;
}

Region::~Region() { unmap(); }

void Region::unmap() {
  fault_guard_.reset();
  if (base_) ::munmap(base_, size_);
  base_ = nullptr;
}

}  // namespace cbd
